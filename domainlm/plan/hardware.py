"""Accelerators' peak dense bf16 FLOP/s and memory, and a short probe of this machine's speed."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

from domainlm.errors import UserError
from domainlm.recipe.model import LlamaConfig

GB = 10**9
PROBE_VERSION = 1


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense (no 2:4 sparsity) bf16 tensor FLOP/s; fp16 where there is no bf16
    memory_bytes: int
    description: str
    source: str


# Dense figures: vendors print "with sparsity" numbers twice as large; MFU is quoted against
# dense peak (PaLM, Chowdhery et al. 2022, appendix B), so those are halved here.
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        # NVIDIA H100 Tensor Core GPU datasheet: SXM5 BF16 1,979 TFLOPS with sparsity.
        Accelerator("h100", 989.4e12, 80 * GB, "NVIDIA H100 SXM 80 GB", "NVIDIA H100 datasheet"),
        # Same datasheet: PCIe BF16 1,513 TFLOPS with sparsity.
        Accelerator(
            "h100-pcie", 756e12, 80 * GB, "NVIDIA H100 PCIe 80 GB", "NVIDIA H100 datasheet"
        ),
        # NVIDIA H200 datasheet: SXM BF16 1,979 TFLOPS with sparsity (the H100's GH100 die, with
        # 141 GB of HBM3e).
        Accelerator("h200", 989.4e12, 141 * GB, "NVIDIA H200 SXM 141 GB", "NVIDIA H200 datasheet"),
        # NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity), SXM and PCIe alike.
        Accelerator("a100", 312e12, 80 * GB, "NVIDIA A100 80 GB", "NVIDIA A100 datasheet"),
        Accelerator("a100-40gb", 312e12, 40 * GB, "NVIDIA A100 40 GB", "NVIDIA A100 datasheet"),
        # AWS's A10G is a GA102 A10 variant with no separate datasheet; NVIDIA A10 datasheet:
        # BF16 125 TFLOPS dense (250 with sparsity), as Lightning's throughput table also uses.
        Accelerator("a10g", 125e12, 24 * GB, "NVIDIA A10G 24 GB (AWS g5)", "NVIDIA A10 datasheet"),
        # NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity.
        Accelerator("l4", 121e12, 24 * GB, "NVIDIA L4 24 GB", "NVIDIA L4 datasheet"),
        # NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity).
        Accelerator("l40s", 362.05e12, 48 * GB, "NVIDIA L40S 48 GB", "NVIDIA L40S datasheet"),
        # NVIDIA V100 datasheet: SXM2 "deep learning" 125 TFLOPS, fp16 tensor cores (Volta has no
        # bf16: train it with 16-mixed, which needs the same memory as bf16-mixed).
        Accelerator(
            "v100", 125e12, 32 * GB, "NVIDIA V100 SXM2 32 GB (fp16)", "NVIDIA V100 datasheet"
        ),
        # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity).
        Accelerator(
            "mi300x", 1307.4e12, 192 * GB, "AMD Instinct MI300X 192 GB", "AMD MI300X datasheet"
        ),
        # NVIDIA HGX B200 (Blackwell datasheet): FP16/BF16 4.5 PFLOPS with sparsity per GPU;
        # DGX B200 has 1,440 GB of HBM3e over 8 GPUs.
        Accelerator("b200", 2.25e15, 180 * GB, "NVIDIA B200 180 GB", "NVIDIA Blackwell datasheet"),
        # NVIDIA Ada Lovelace architecture whitepaper, appendix: GeForce RTX 4090 peak BF16 tensor
        # TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity); training accumulates in fp32.
        Accelerator(
            "rtx4090", 165.2e12, 24 * GB, "NVIDIA GeForce RTX 4090 24 GB", "NVIDIA Ada whitepaper"
        ),
    )
}


def accelerator(name: str) -> Accelerator:
    """The table's entry for `name` (case and separators ignored), or a UserError that lists all."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    aliases = {k.replace("-", ""): k for k in ACCELERATORS}
    key = aliases.get(key.replace("-", ""), key)
    if key in ACCELERATORS:
        return ACCELERATORS[key]
    close = difflib.get_close_matches(key, list(ACCELERATORS), n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"unknown gpu {name!r}; {hint}known: {', '.join(sorted(ACCELERATORS))} "
        "(or give the budget as --flops)"
    )


# ------------------------------------------------------------------------------- local probe


@dataclass(frozen=True)
class Probe:
    """This machine's measured training speed, in model FLOPs (6 N per token) per second."""

    device: str  # "cpu" or "cuda"
    name: str  # the processor or GPU model
    devices: int  # GPUs when device is cuda (each assumed as fast as the one measured), else 1
    flops_per_s: float  # per device
    memory_bytes: int  # per device: RAM for the CPU, the GPU's memory otherwise
    dtype: str
    seconds: float  # how long the probe ran
    steps: int
    machine: str  # fingerprint: a measurement is reused only on the same machine and software

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """What trains here, as a report names it: the GPU's name (and count), else the CPU's."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} × {torch.cuda.get_device_name(0)}" if n > 1 else torch.cuda.get_device_name(0)
    return f"{_cpu_name()} (CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _ram_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # A container's memory limit is what a training run can actually use.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def machine_fingerprint() -> str:
    """Identifies this machine and software, so a stored probe is reused only where it holds."""
    import torch

    cuda = torch.cuda.is_available()
    parts = [
        platform.node(),
        platform.machine(),
        _cpu_name(),
        str(os.cpu_count()),
        str(torch.get_num_threads()),
        torch.__version__,
        torch.cuda.get_device_name(0) if cuda else "cpu",
        str(PROBE_VERSION),
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def probe(seconds: float = 0.75, limit: float = 2.5) -> Probe:
    """Measure training FLOP/s with a few forward+backward steps of a one-block transformer.

    The workload is what a small model's training step does: embedding, attention through
    scaled_dot_product_attention, a SwiGLU MLP, the output projection and a cross-entropy over
    the vocabulary, under bf16 autocast (the pipeline's bf16-mixed precision, also on CPU).
    On a CPU the softmax and cross-entropy cost about as much as the matmuls, which is why a
    bare matmul benchmark would promise twice the speed that training gets. FLOPs are counted
    as 6 N per token, like the budget. A warm-up step runs first; the rate is the median of the
    timed steps, which one step slowed (or sped) by other processes does not move. Timed steps
    run for about `seconds` (at least 3 of them), and stop early once `limit` seconds have
    passed since the start, so a busy machine is probed in under 3 s too.
    """
    import torch
    import torch.nn.functional as F

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # Sizes of the models each device trains in a short budget: tiny on a CPU.
    d, vocab, seq, batch = (2048, 32768, 1024, 4) if cuda else (256, 4096, 256, 2)
    ffn, heads = 8 * d // 3 // 64 * 64, d // 64
    g = torch.Generator(device="cpu").manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(device).requires_grad_()

    emb, wqkv, wo = weight(vocab, d), weight(3 * d, d), weight(d, d)
    wgu, wd = weight(2 * ffn, d), weight(d, ffn)
    n_params = vocab * d + 4 * d * d + 3 * d * ffn
    idx = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    targets = torch.randint(0, vocab, (batch, seq), generator=g).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x = F.embedding(idx, emb)
            qkv = F.linear(x, wqkv).view(batch, seq, 3, heads, d // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(a.transpose(1, 2).reshape(batch, seq, d), wo)
            gate, up = F.linear(x, wgu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, wd)
            logits = F.linear(x, emb)
        loss = F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))
        loss.backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: kernel selection and allocation
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < 50:
        t = time.perf_counter()
        enough = len(times) >= 3 and t - t0 >= seconds
        # Stop before a step that would end past the limit (steps take about the same time).
        if enough or (times and t - t_start + times[-1] > limit):
            break
        step()
        times.append(time.perf_counter() - t)
    rate = 6.0 * n_params * batch * seq / statistics.median(times)
    if cuda:
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory
        devices = torch.cuda.device_count()
    else:
        name, memory, devices = _cpu_name(), _ram_bytes(), 1
    return Probe(
        device=device.type,
        name=name,
        devices=devices,
        flops_per_s=rate,
        memory_bytes=memory,
        dtype="bfloat16",
        seconds=round(time.perf_counter() - t_start, 3),
        steps=len(times),
        machine=machine_fingerprint(),
    )


def probe_model(
    shape: LlamaConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16-mixed",
    checkpointing: bool = False,
    seconds: float = 1.0,
    limit: float = 6.0,
) -> tuple[float, int]:
    """(FLOP/s, timed steps) of a real training step of this model shape on this machine.

    The step is what `make pretrain` runs: our decoder forward and backward on a micro-batch
    under the precision, then AdamW. FLOPs are counted as the budget counts them, 6 N per
    token with N all parameters. A warm-up step runs first; the median of the timed steps
    (at least 2, for about `seconds`, stopping before `limit`) gives the rate.
    """
    import torch

    from domainlm.model.llama import Llama

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dataclasses.replace(shape, max_seq_len=seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Llama(config).to(device)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing = checkpointing
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g).to(device)
    targets = torch.roll(idx, -1, dims=1)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < 20:
        t = time.perf_counter()
        if len(times) >= 2 and (t - t0 >= seconds or t - t_start + times[-1] > limit):
            break
        step()
        times.append(time.perf_counter() - t)
    n = config.num_params()
    return 6.0 * n * micro_batch * seq_len / statistics.median(times), len(times)
