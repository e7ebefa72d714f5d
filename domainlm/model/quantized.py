"""Weight-only quantization of the decoder's block projections (int8 per output channel, int4 in
groups along each row), a forward that runs on the CPU, and a safetensors folder for the result.

Why not torchao (0.18.0, tried on torch 2.13 CPU): it installs without pulling anything (its
compiled extensions are CUDA-only and fail to load, with a warning), and Int8WeightOnlyConfig runs
on the CPU, as a tensor subclass that safetensors cannot save. Its int4 weight-only formats do
not: "plain"/"preshuffled" need the mslk package, "plain_int32" refuses device 'cpu',
"tile_packed_to_4d" asserts CUDA, and IntxWeightOnlyConfig keeps one 4-bit value per int8 byte.
The prototype PrototypeInt4WeightOnlyConfig does run int4 on the CPU, but its weight is the
kernel's ISA-tiled layout (a subclass again), and it has no backward to the input, which QLoRA
needs to reach the adapters of earlier layers. So we quantize ourselves (a few lines of
arithmetic), call the same aten CPU kernels where they are faster, and keep
dequantize-then-matmul as the reference.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.files import atomic_dir, read_json, write_json
from domainlm.model.llama import Llama, RotaryEmbedding
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer.hf_files import read_model_proto, write_tokenizer_files
from domainlm.tokenizer.special import SpecialTokens

# Every projection of a block, as (sub-module, leaf). The token embedding and the output head stay
# in float: the embedding is a row lookup, with no matmul to speed up, and the head's error goes
# straight into the logits. llama.cpp's quantizer does likewise for the head: a Q4_0 file stores
# output.weight (or token_embd.weight when the two are tied) as Q6_K, or Q8_0 when its rows do not
# fit the block size, while an untied token embedding is quantized to Q4_0 with the blocks.
BLOCK_LINEARS = tuple(
    (parent, leaf)
    for parent, leaves in (("self_attn", "q k v o"), ("mlp", "gate up down"))
    for leaf in (f"{n}_proj" for n in leaves.split())
)
SCHEMES = {8: "int8-symmetric-per-channel", 4: "int4-asymmetric-groupwise"}
QUANT_METHOD = "domainlm"
WEIGHTS = "model.safetensors"
# torch's CPU kernels (torch >= 2.6) against dequantize-then-matmul, measured on one AVX-512 core
# (256² and 2048² layers): with bf16 inputs of up to 16 rows they are 1.5-20x faster (2048², one
# row: int8 0.23 vs 2.4 ms, int4 0.27 vs 5.8 ms); with fp32 or fp16 inputs they are 2-45x slower
# at every size, so those always take the reference path.
_KERNELS = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_KERNEL_MAX_ROWS = {torch.bfloat16: 16}


class _Dequantized(torch.autograd.Function):
    """x @ dequantize()ᵀ that dequantizes again in backward rather than saving the float weight,
    so a QLoRA base holds 4-bit weights, not float copies, between forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A frozen, weight-only quantized stand-in for a bias-free nn.Linear.

    bits=8: qweight int8 (out, in), w = q·scale with one scale per output row, q in [-127, 127].
    bits=4: qweight uint8 (out, in/2), byte j of a row holding column 2j in its low nibble and
    2j+1 in its high one; w = q·scale + min with q in [0, 15] and one scale and min per group of
    group_size columns. Asymmetric because 16 levels are few: spanning [min, max] uses all of
    them, so the step (max-min)/15 is never coarser than a symmetric grid's and finer whenever a
    group is not centred on zero; it is also the layout of torch's int4 kernel. Scales are fp32.
    """

    use_kernel = True  # False: always the dequantize-then-matmul reference path

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64):
        super().__init__()
        if bits not in SCHEMES or (bits == 4 and (in_features % group_size or in_features % 2)):
            raise ValueError(
                f"cannot quantize {in_features} columns to {bits} bits by {group_size}"
            )
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else in_features
        groups = in_features // self.group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features).char())
            self.register_buffer("scales", torch.ones(out_features))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2).byte())
            self.register_buffer("scales", torch.ones(out_features, groups))
            self.register_buffer("mins", torch.zeros(out_features, groups))
        # The int4 kernel's own limits; other shapes take the reference path.
        self._kernel_shape_ok = bits == 8 or (
            out_features % 16 == 0 and self.group_size in (32, 64, 128, 256)
        )
        self._cache: tuple[torch.dtype, Tensor, Tensor] | None = None  # int4 kernel layout

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 64) -> QuantLinear:
        """`linear`'s weight rounded to the nearest code."""
        if linear.bias is not None:
            raise ValueError("QuantLinear replaces bias-free Linear layers only")
        with torch.device(linear.weight.device):
            layer = cls(linear.in_features, linear.out_features, bits, group_size)
        w = linear.weight.detach().float()
        # A floor on the scale (torchao's) keeps a zero row or a constant group exact, and keeps
        # the int4 kernel's zero point, min + 8·scale, as close to min as bf16 can hold it.
        eps = torch.finfo(torch.float32).eps
        if bits == 8:
            scale = (w.abs().amax(dim=1) / 127).clamp_(min=eps)
            layer.qweight.copy_(torch.round(w / scale[:, None]).clamp_(-127, 127))
            layer.scales.copy_(scale)
        else:
            g = w.view(w.size(0), -1, layer.group_size)
            lo, hi = g.amin(dim=-1), g.amax(dim=-1)
            scale = ((hi - lo) / 15).clamp_(min=eps)
            q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
            q = q.view(w.size(0), -1, 2)
            layer.qweight.copy_(q[..., 0] | (q[..., 1] << 4))
            layer.scales.copy_(scale)
            layer.mins.copy_(lo)
        return layer

    @property
    def state(self) -> dict[str, Tensor]:
        """The quantized storage as plain tensors (what safetensors saves)."""
        return dict(self.named_buffers(recurse=False))

    def weight_bytes(self) -> int:
        """Bytes of the quantized storage (the int4 kernel's cached copy, if built, is extra)."""
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def _codes(self, dtype: torch.dtype = torch.uint8) -> Tensor:
        """The integer codes (out, in) in dtype: int8's as stored, int4's unpacked to 0..15."""
        if self.bits == 8:
            return self.qweight.to(dtype)
        # Written into one buffer through strided views: 10x faster than stacking the nibbles.
        q = torch.empty(
            self.out_features, self.in_features // 2, 2, dtype=dtype, device=self.qweight.device
        )
        q[..., 0], q[..., 1] = self.qweight & 15, self.qweight >> 4
        return q.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight that the codes stand for, computed in fp32 and cast to dtype."""
        w = self._codes(torch.float32)
        if self.bits == 8:
            return w.mul_(self.scales.float()[:, None]).to(dtype)
        g = w.view(self.out_features, -1, self.group_size)
        g.mul_(self.scales.float()[..., None]).add_(self.mins.float()[..., None])
        return w.to(dtype)

    def _kernel_applies(self, x: Tensor) -> bool:
        return (
            _KERNELS
            and self.use_kernel
            and self._kernel_shape_ok
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.is_autocast_enabled("cpu")  # autocast expects bf16 math from fp32 x
            and x.numel() // self.in_features <= _KERNEL_MAX_ROWS.get(x.dtype, 0)
        )

    def _kernel(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))
        else:
            if self._cache is None or self._cache[0] != x.dtype:
                # The kernel's layout is tiled per CPU ISA, so it is built here, never stored; its
                # zero point sits in the middle of the code range: w = (q - 8)·scale + zero.
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    self._codes(torch.int32), 1
                )
                zero = self.mins + 8 * self.scales
                sz = torch.stack((self.scales.t(), zero.t()), dim=-1).to(x.dtype).contiguous()
                self._cache = (x.dtype, packed, sz)
            _, packed, sz = self._cache
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel_applies(x):
            return self._kernel(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Dequantized.apply(x, self)
        return F.linear(x, self.dequantize(x.dtype))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> QuantLinear:
        self._cache = None  # moved or cast: the kernel copy is rebuilt from the buffers
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{group}"


def _block_linears(model: Llama) -> list[tuple[str, nn.Module, str]]:
    """(module name, parent module, leaf) of every block projection."""
    return [
        (f"model.layers.{i}.{parent}.{leaf}", getattr(block, parent), leaf)
        for i, block in enumerate(model.model.layers)
        for parent, leaf in BLOCK_LINEARS
    ]


def _check(bits: Any, group_size: Any, model: Llama, field: str) -> None:
    """A UserError naming `field` (the recipe field, or the file) unless every block projection
    can be quantized to `bits` in groups of `group_size`."""
    if bits not in SCHEMES:
        raise UserError(f"quantization bits must be 4 or 8, got {bits!r}")
    if bits == 8:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise UserError(f"{field} must be a positive integer, got {group_size!r}")
    for name, parent, leaf in _block_linears(model):
        n = getattr(parent, leaf).in_features
        if n % group_size or n % 2:
            raise UserError(
                f"{field} = {group_size} does not divide the {n} input features of {name} (int4 "
                "packs two per byte, so they must be even too); choose a group size that divides "
                "d_model and ffn_dim, such as 32 or 64"
            )


def quantize_model(
    model: Llama, bits: int, group_size: int = 64, *, field: str = "export.group_size"
) -> Llama:
    """A copy of `model` whose block projections are QuantLinear; embeddings, norms and the
    output head stay as they are. `field` names the recipe field that group_size came from."""
    _check(bits, group_size, model, field)
    targets = _block_linears(model)
    for name, parent, leaf in targets:
        kind = type(getattr(parent, leaf))
        if kind is not nn.Linear:
            raise TypeError(f"{name} is a {kind.__name__}: quantize a plain model (merge first)")
    quantized = [
        QuantLinear.from_linear(getattr(p, leaf), bits, group_size) for _, p, leaf in targets
    ]
    # The copy skips the float weights that are about to be replaced (a placeholder stands in for
    # each), so quantizing a large model never holds two float copies of it.
    memo: dict[int, Any] = {id(getattr(p, leaf)): None for _, p, leaf in targets}
    out = copy.deepcopy(model, memo)
    for (name, _, _), layer in zip(targets, quantized, strict=True):
        parent_name, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent_name), leaf, layer)
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (parameters and persistent buffers, a tied one once)."""
    seen = {(t.data_ptr(), t.numel()): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


# ---------------------------------------------------------------------------------- the folder


def save_quantized(
    model: Llama,
    out_dir: Path,
    tokenizer_model: Path,
    bits: int,
    group_size: int = 64,
    *,
    chat_template: str | None = None,
) -> Path:
    """Write config.json (with a quantization_config), model.safetensors and the tokenizer files.

    `model` is a float model (quantized here) or one quantize_model made with these settings.
    The folder is built beside out_dir and renamed into place.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        model = quantize_model(model, bits, group_size)
    elif any(m.bits != bits or (bits == 4 and m.group_size != group_size) for m in layers):
        raise ValueError(f"the model is not quantized with bits={bits}, group_size={group_size}")
    proto = read_model_proto(Path(tokenizer_model))  # a missing or broken file fails first
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = SpecialTokens.from_model(sp)
    config = model.config
    float_dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    hf = config.to_hf_dict(ids.bos_id, ids.eos_id, ids.pad_id, float_dtype)
    hf["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,  # int8: one scale per output row
        "scheme": SCHEMES[bits],
    }
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # the embedding, re-tied on load (as transformers does)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_dir(Path(out_dir)) as tmp:
        write_json(tmp / "config.json", hf)
        metadata = {"format": "pt", "quant_method": QUANT_METHOD}
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)
        write_tokenizer_files(
            Path(tokenizer_model), tmp, chat_template, model_max_length=config.max_seq_len
        )
    return Path(out_dir)


def load_quantized(path: Path) -> Llama:
    """The model save_quantized wrote, in eval mode (weights read with safetensors only)."""
    path = Path(path)
    config_path, weights = path / "config.json", path / WEIGHTS
    fix = "quantize the model again with save_quantized"
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: {path} is not a quantized model folder; {fix}")
    try:
        hf = read_json(config_path)
        quant = hf.get("quantization_config")
    except (ValueError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{config_path} is not a JSON config ({e}); {fix}") from None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise UserError(
            f"{config_path} has no domainlm quantization_config: load a float folder with "
            f"load_hf_folder, or {fix}"
        )
    bits, group_size = quant.get("bits"), quant.get("group_size") or 0
    if not isinstance(bits, int) or quant.get("scheme") != SCHEMES.get(bits):
        what = f"bits {bits!r} with scheme {quant.get('scheme')!r}"
        raise UserError(f"{config_path}: quantization_config has {what}; {fix}")
    if not weights.is_file():
        raise UserError(f"{weights} is missing; {fix}, or copy the whole folder")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}); {fix}") from None

    config = LlamaConfig.from_hf_dict(hf)
    # Built on the meta device and given the file's tensors as they are (assign): no float copy
    # of the block weights is ever allocated, and the float parts keep the file's dtype.
    with torch.device("meta"):
        model = Llama(config)
        _check(bits, group_size, model, f"{config_path}: quantization_config.group_size")
        for _, parent, leaf in _block_linears(model):
            lin = getattr(parent, leaf)
            setattr(parent, leaf, QuantLinear(lin.in_features, lin.out_features, bits, group_size))
    if config.tie_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    expected = model.state_dict()
    for k in sorted(expected.keys() | state.keys()):
        got, want = state.get(k), expected.get(k)
        # The codes' dtype is the format; scales and float weights may have any float dtype.
        if (
            got is None
            or want is None
            or got.shape != want.shape
            or not (got.dtype == want.dtype if k.endswith(".qweight") else got.is_floating_point())
        ):
            what = "missing" if got is None else f"{got.dtype} {tuple(got.shape)}"
            implied = f"{want.dtype} {tuple(want.shape)}" if want is not None else "no such tensor"
            raise UserError(
                f"{weights}: tensor {k} is {what}, but {config_path} implies {implied}; {fix}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign made two Parameters
    model.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
    return model.eval()
