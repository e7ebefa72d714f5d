"""Weight-only quantization and QLoRA: int8/int4 error bounds, packed storage, the CPU forward
against dequantized math, logits of a quantized model, the folder round trip, and QLoRA training
over a bit-identical 4-bit base whose adapter also works on the float base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from builders import logits_of, random_tokens, sentencepiece_model, tiny_model
from safetensors.torch import load_file

from domainlm.errors import UserError
from domainlm.model import quantized as quantize
from domainlm.model.compressed import load_quantized, save_quantized
from domainlm.model.decode import generate
from domainlm.model.hf import save_hf_folder
from domainlm.model.peft import LoRALinear, load, load_lora, prepare, save
from domainlm.model.peft.qlora import base_memory_bytes
from domainlm.model.quantized import QuantLinear, model_bytes, quantize_model
from domainlm.recipe.finetune import FinetuneConfig, LoRAConfig, QLoRAConfig

VOCAB = 320  # builders.sentencepiece_model's size, so the models here can be saved
# small_config: 2 layers, d_model 64, 4 query heads, 2 key/value heads (kv width 32), ffn 96.
D, KV, FFN, LAYERS = 64, 32, 96, 2
GS = 32  # divides both input sizes, d_model and ffn_dim
BLOCK_WEIGHTS = LAYERS * (2 * D * D + 2 * D * KV + 3 * D * FFN)


build, tokens, logits = tiny_model, random_tokens, logits_of


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear(n_in: int = 96, n_out: int = 48, seed: int = 0) -> torch.nn.Linear:
    """Gaussian weights with an outlier, an all-zero row and a constant group: the edge cases."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight[3, 5] = 0.5
        lin.weight[7] = 0.0
        lin.weight[9, :GS] = 0.01
    return lin


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return sentencepiece_model(tmp_path_factory.mktemp("tok"))


# --------------------------------------------------------------------------------------------
# One layer: error bounds, storage, forward.


def test_int8_per_channel_is_within_half_a_step() -> None:
    lin = linear()
    q = QuantLinear.from_linear(lin, 8)
    w, dq = lin.weight.detach(), q.dequantize()
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (48,)
    step = q.scales[:, None]
    assert ((w - dq).abs() <= step / 2 * (1 + 1e-4)).all()
    # Symmetric, as compressed-tensors: a row's largest magnitude is 127.5 steps, so it gets code
    # 127 or -128 (rounded half to even, then clamped), within half a step.
    codes = q.qweight.int().amax(dim=1).maximum(-q.qweight.int().amin(dim=1))
    assert set(codes[torch.arange(48) != 7].tolist()) <= {127, 128}
    assert torch.equal(dq[7], torch.zeros(FFN))  # the zero row stays zero


def test_int4_group_wise_is_within_half_a_step() -> None:
    lin = linear()
    q = QuantLinear.from_linear(lin, 4, GS)
    w, dq = lin.weight.detach(), q.dequantize()
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, FFN // 2)
    assert q.scales.shape == (48, FFN // GS) and "mins" not in q.state
    step = q.scales.repeat_interleave(GS, dim=1)
    assert ((w - dq).abs() <= step / 2 * (1 + 1e-4) + 1e-9).all()
    # Symmetric: each group's largest magnitude is 7.5 steps (a zero group's step is fp32's eps).
    groups = w.view(48, -1, GS)
    want = (groups.abs().amax(dim=-1) / 7.5).clamp(min=torch.finfo(torch.float32).eps)
    assert torch.equal(q.scales, want) and torch.equal(dq[7], torch.zeros(FFN))
    # Two codes per byte (q + 8), column 2j in the low nibble, 2j+1 in the high one.
    codes = torch.round((groups / q.scales[..., None]).clamp(-8, 7)).view(48, FFN).int() + 8
    assert torch.equal(q.qweight[:, 0].int() & 15, codes[:, 0])
    assert torch.equal(q.qweight[:, 0].int() >> 4, codes[:, 1])


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_and_scales_are_compressed_tensors_own(bits: int) -> None:
    """compressed-tensors' quantizer (calculate_qparams + quantize, the math llm-compressor
    writes W8A16/W4A16 with) gives exactly our scales and codes."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    lin = linear()
    q = QuantLinear.from_linear(lin, bits, GS)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            strategy="channel" if bits == 8 else "group",
                            group_size=None if bits == 8 else GS)
    w = lin.weight.detach()
    g = w.view(48, -1, q.group_size)
    scale, zero = calculate_qparams(g.amin(dim=-1), g.amax(dim=-1), args)
    codes = ct_quantize(w, scale, zero, args, dtype=torch.int8)
    assert torch.equal(scale.view(q.scales.shape), q.scales)
    from domainlm.model.compressed import _signed_codes

    assert torch.equal(codes.int(), _signed_codes(q))
    assert torch.equal(dequantize(codes, scale, zero, args, dtype=torch.float32), q.dequantize())


def test_packed_storage_bytes() -> None:
    lin = torch.nn.Linear(256, 128, bias=False)
    fp32 = 256 * 128 * 4
    q8, q4 = QuantLinear.from_linear(lin, 8), QuantLinear.from_linear(lin, 4, 64)
    assert q8.weight_bytes() == 256 * 128 + 128 * 4  # a byte a weight + a scale a row
    scales = 128 * (256 // 64) * 4  # an fp32 scale per group of 64
    assert q4.weight_bytes() == 256 * 128 // 2 + scales == fp32 // 8 + scales
    assert q4.weight_bytes() / fp32 == pytest.approx(0.1406, abs=1e-3)
    # The storage is plain tensors, as safetensors needs them.
    assert set(q4.state) == set(q8.state) == {"qweight", "scales"}
    assert all(type(t) is torch.Tensor for t in q4.state.values())


@pytest.mark.parametrize("bits", [8, 4])
def test_forward_is_the_dequantized_matmul(bits: int) -> None:
    q = QuantLinear.from_linear(linear(n_out=64), bits, GS)
    # Many rows (and grad): the reference path, exactly F.linear over the dequantized weight.
    x = torch.randn(3, 5, FFN)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize()), atol=1e-5, rtol=0)
    x.requires_grad_(True)
    q(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    F.linear(ref, q.dequantize()).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-5, rtol=0)
    # A few bf16 rows take torch's int8/int4 CPU kernels (where this torch has them): the same
    # product up to bf16 rounding. fp32, where the kernels are slower, never does.
    x = torch.randn(4, FFN).bfloat16()
    assert q._kernel_applies(x) == quantize._KERNELS
    assert not q._kernel_applies(x[:1].float()) and not q._kernel_applies(x.repeat(5, 1))
    want = F.linear(x.float(), q.dequantize().bfloat16().float())
    torch.testing.assert_close(q(x).float(), want, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------
# A whole model.


def test_quantized_model_logits_and_generation() -> None:
    base = build()
    idx = tokens()
    ref = logits(base, idx)
    q8, q4 = quantize_model(base, 8), quantize_model(base, 4, GS)
    err8, err4 = rel_err(logits(q8, idx), ref), rel_err(logits(q4, idx), ref)
    print(f"relative logits error: int8 {err8:.2e}, int4 (group {GS}) {err4:.2e}")
    assert err8 < 0.01 and err4 < 0.1 and err8 < err4 / 4
    # Block projections quantized; embedding, norms and head untouched; the original unchanged.
    layer = q4.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and (layer.in_features, layer.out_features) == (FFN, D)
    assert type(base.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(q4.lm_head.weight, base.lm_head.weight)
    fp32 = model_bytes(base)
    assert model_bytes(q4) < model_bytes(q8) < fp32 - BLOCK_WEIGHTS * 4 * 0.7
    # Greedy generation with the KV cache equals the uncached one.
    for model in (q8, q4):
        cached = generate(model, idx[:, :5], 8, use_cache=True)
        assert torch.equal(cached, generate(model, idx[:, :5], 8, use_cache=False))
    # In bf16 a cached step (two rows) goes through the CPU kernels: logits as the reference's.
    for bits in (8, 4):
        model = quantize_model(build().bfloat16(), bits, GS)
        cache: list = []
        with torch.no_grad():
            model(idx[:, :6], cache=cache)
            step = model(idx[:, 6:7], cache=cache)[0]
            QuantLinear.use_kernel = False
            try:
                reference = model(idx[:, :7])[0][:, -1:]
            finally:
                QuantLinear.use_kernel = True
        assert rel_err(step.float(), reference.float()) < 0.02
        assert generate(model, idx[:, :5], 8).shape == (2, 13)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_gives_identical_logits(tmp_path, tokenizer, bits, tied) -> None:
    base = build(tie_embeddings=tied)
    model = quantize_model(base, bits, GS)
    folder = save_quantized(model, tmp_path / "q", tokenizer, bits, GS)
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (
        bits, True, GS if bits == 4 else None)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file()
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.weight_packed"].dtype == torch.int32
    assert tensors[f"{key}.weight_packed"].shape == (D, D * bits // 32)
    assert tensors[f"{key}.weight_shape"].tolist() == [D, D]
    assert f"{key}.weight" not in tensors and ("lm_head.weight" in tensors) != tied

    loaded = load_quantized(folder)
    assert torch.equal(logits(loaded, tokens()), logits(model, tokens()))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    # A float model is quantized on the way: the same file.
    save_quantized(base, tmp_path / "f", tokenizer, bits, GS)
    assert load_file(tmp_path / "f" / "model.safetensors").keys() == tensors.keys()


@pytest.mark.parametrize("bits", [8, 4])
def test_transformers_loads_the_quantized_folder_with_our_logits(tmp_path, tokenizer, bits):
    """The real compressed-tensors path of transformers: its model's logits are ours (the same
    codes and scales, dequantized), within quantization error of the float model."""
    import transformers

    base = build()
    model = quantize_model(base, bits, GS)
    folder = save_quantized(model, tmp_path / "q", tokenizer, bits, GS)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert theirs.config.quantization_config is not None  # recognised, not skipped
    idx = tokens()
    with torch.no_grad():
        got = theirs(input_ids=idx).logits
    ours = logits(model, idx)
    assert (got - ours).abs().max().item() <= 1e-5
    assert rel_err(got, logits(base, idx)) < (0.01 if bits == 8 else 0.1)
    # As `make quantize` writes it: scales and float parts in bf16 (servers hold them so);
    # transformers loads it in bf16 and agrees with our bf16 model up to bf16 rounding.
    half = quantize_model(base, bits, GS).to(torch.bfloat16)
    folder16 = save_quantized(half, tmp_path / "q16", tokenizer, bits, GS)
    assert json.loads((folder16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    theirs16 = transformers.AutoModelForCausalLM.from_pretrained(folder16, dtype="auto").eval()
    assert theirs16.dtype == torch.bfloat16
    with torch.no_grad():
        got16 = theirs16(input_ids=idx).logits.float()
    assert rel_err(got16, logits(half, idx).float()) < 0.02
    # `domainlm generate` loads the folder (load_model is the one loader).
    from click.testing import CliRunner

    from domainlm.cli import main
    from domainlm.model.load import load_model

    assert torch.equal(logits(load_model(folder), idx), ours)
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "--prompt", "a",
                                       "-n", "4"])
    assert result.exit_code == 0, result.output


def test_every_quantization_config_we_write_is_one_transformers_knows(tmp_path, tokenizer):
    """transformers skips a quantization_config whose quant_method it does not know, without an
    error, and runs random linear layers: domainlm's former `quant_method: domainlm` did that."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert "domainlm" not in AUTO_QUANTIZER_MAPPING  # the former format would misload
    base = build()
    folders = [save_hf_folder(base, tokenizer, tmp_path / "float")]
    folders += [save_quantized(base, tmp_path / f"q{b}", tokenizer, b, GS) for b in (8, 4)]
    for folder in folders:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config")
        assert quant is None or quant["quant_method"] in AUTO_QUANTIZER_MAPPING
    # A folder in the former format is refused with the fix, never read as something else.
    config = json.loads((folders[2] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "domainlm", "bits": 4, "group_size": GS}
    (folders[2] / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="make quantize` again"):
        load_quantized(folders[2])


def test_group_size_and_folder_errors(tmp_path, tokenizer) -> None:
    base = build()
    # 64 divides d_model but not ffn_dim 96: the first layer fed by the MLP's hidden size fails.
    with pytest.raises(UserError, match=r"export\.group_size = 64 .*model\.layers\.0\.mlp\.down_"):
        quantize_model(base, 4, 64)
    ft = FinetuneConfig(qlora=QLoRAConfig(group_size=64))
    with pytest.raises(UserError, match=r"finetune\.qlora\.group_size"):
        prepare(base, "qlora", ft)
    with pytest.raises(UserError, match="load_hf_folder"):
        load_quantized(save_hf_folder(base, tokenizer, tmp_path / "float"))
    folder = save_quantized(base, tmp_path / "q", tokenizer, 4, GS)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_quantized(folder)


# --------------------------------------------------------------------------------------------
# QLoRA.


def qlora_config() -> FinetuneConfig:
    return FinetuneConfig(
        lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        qlora=QLoRAConfig(group_size=GS, lr=2e-3),
    )


def test_qlora_trains_the_adapter_over_a_bit_identical_4bit_base(tmp_path, tokenizer) -> None:
    base, ft = build(), qlora_config()
    module, info = prepare(base, "qlora", ft)
    _, lora_info = prepare(base, "lora", ft)
    assert (info.method, info.lr) == ("qlora", 2e-3)
    assert info.trainable == lora_info.trainable == LAYERS * 4 * ((D + D) + (D + KV))
    assert info.total == lora_info.total  # a quantized weight counts as one parameter
    q_proj = module.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base_layer, QuantLinear)

    frozen = {k: v.clone() for k, v in module.state_dict().items() if "lora_" not in k}
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    for step in range(3):
        idx = tokens(seed=10 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step == 2):  # as bf16-mixed
            _, loss = module(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # codes, scales, embeddings
    assert all(not torch.equal(p, lora[n]) for n, p in module.named_parameters() if n in lora)

    fp32_linears = BLOCK_WEIGHTS * 4
    print(f"QLoRA base: {base_memory_bytes(module)} bytes, fp32 linears {fp32_linears}")
    assert base_memory_bytes(module) < 0.3 * fp32_linears

    # The adapter is a plain LoRA folder: it loads on the float base and works there, and on
    # the quantized base it gives exactly the trained logits.
    save(module, "qlora", tmp_path / "qlora", ft, None, tokenizer)
    config = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    on_float = load(base, "qlora", tmp_path / "qlora")
    assert type(on_float.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    idx = tokens(length=20)
    trained, quantized_base = logits(module, idx), quantize_model(base, 4, GS)
    adapter_effect = logits(on_float, idx) - logits(base, idx)
    trained_effect = trained - logits(quantized_base, idx)
    assert adapter_effect.abs().max() > 1e-3  # the adapter changes the float model...
    assert rel_err(adapter_effect, trained_effect) < 0.2  # ...much as it did the 4-bit one
    assert generate(on_float, idx[:1, :4], 6).shape == (1, 10)
    load_lora(quantized_base, tmp_path / "qlora")
    assert (logits(quantized_base, idx) - trained).abs().max() <= 1e-5
