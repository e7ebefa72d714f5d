"""Weight-only quantization of the decoder's block projections (int8 per output channel, int4 in
groups along each row, both symmetric) and a forward that runs on the CPU. The arithmetic is
compressed-tensors' (W8A16 / W4A16), so model/compressed.py writes the codes and scales as they
are into the folder transformers and vLLM load.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.model.llama import Llama

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
SCHEMES = {8: "int8-symmetric-per-channel", 4: "int4-symmetric-groupwise"}
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
    """A frozen, weight-only quantized stand-in for a bias-free nn.Linear: w = q·scale.

    Symmetric, as compressed-tensors' W8A16 and W4A16 (the formats servers load): q is a signed
    integer of `bits` bits, q in [-2^(bits-1), 2^(bits-1) - 1], and the scale of a row (int8) or
    of a group of group_size columns of a row (int4) is its largest magnitude divided by
    (2^bits - 1)/2, then q = round(w/scale) clamped to that range (compressed-tensors'
    calculate_qparams and quantize, step for step, so the codes are the ones its own quantizer
    would write).

    bits=8: qweight int8 (out, in), one fp32 scale per output row.
    bits=4: qweight uint8 (out, in/2) holding q + 8, column 2j in the low nibble of byte j and
    2j+1 in the high one (compressed-tensors' int32 packing, read byte by byte; also the layout
    of torch's int4 kernel); one fp32 scale per group.
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
            self.register_buffer("qweight", torch.full((out_features, in_features // 2), 0x88,
                                                       dtype=torch.uint8))  # q = 0
            self.register_buffer("scales", torch.ones(out_features, groups))
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
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        g = w.view(w.size(0), -1, layer.group_size)
        scale = g.abs().amax(dim=-1) / ((hi - lo) / 2)
        # A zero row or group: compressed-tensors' floor on the scale, so it stays exactly zero.
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
        q = torch.round((g / scale[..., None]).clamp_(lo, hi)).view_as(w)
        if bits == 8:
            layer.qweight.copy_(q)
            layer.scales.copy_(scale.view(-1))
        else:
            u = (q + 8).to(torch.uint8).view(w.size(0), -1, 2)
            layer.qweight.copy_(u[..., 0] | (u[..., 1] << 4))
            layer.scales.copy_(scale)
        return layer

    @property
    def state(self) -> dict[str, Tensor]:
        """The quantized storage as plain tensors (what safetensors saves)."""
        return dict(self.named_buffers(recurse=False))

    def weight_bytes(self) -> int:
        """Bytes of the quantized storage (the int4 kernel's cached copy, if built, is extra)."""
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def _codes(self, dtype: torch.dtype = torch.uint8) -> Tensor:
        """The integer codes (out, in) in dtype: int8's as stored, int4's unpacked to q + 8,
        0..15."""
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
        g.sub_(8).mul_(self.scales.float()[..., None])
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
                # The kernel's layout is tiled per CPU ISA, so it is built here, never stored. It
                # computes w = (u - 8)·scale + zero from the unsigned code u: symmetric, zero = 0.
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    self._codes(torch.int32), 1
                )
                scales = self.scales.t()
                sz = torch.stack((scales, torch.zeros_like(scales)), dim=-1)
                sz = sz.to(x.dtype).contiguous()
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
